#!/usr/bin/env bash
# A one-node Slurm on this (Debian/Ubuntu, root) machine, for benchmarks/slurm_check.sh where no
# cluster is at hand: munge, slurmctld and slurmd on localhost, one partition "debug" with
# CPUS (default 8) CPUs declared, more than a small machine has, so that two steps of 2 tasks
# run side by side. Test equipment, not part of artune.
set -euo pipefail
CPUS=${CPUS:-8}
command -v slurmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    slurmd slurmctld slurm-client munge >/dev/null
H=$(hostname)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=artunecheck
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd.log
NodeName=$H CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
mkdir -p /var/spool/slurmd /var/spool/slurmctld /run/munge /var/log/munge /etc/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
scontrol shutdown >/dev/null 2>&1 && sleep 2 || true
slurmctld && slurmd && sleep 3
sinfo -N -o "%N %c %T"
