#!/usr/bin/env bash
# A Slurm on this one (Debian/Ubuntu, root) machine, for benchmarks/slurm_check.sh where no
# cluster is at hand: munge, slurmctld and NODES slurmd daemons (default 1; with 2 or more, each
# an emulated node n1, n2, ... of its own port, names resolving to 127.0.0.1 via /etc/hosts),
# one partition "debug", CPUS CPUs declared per node (default 8, more than a small machine has,
# so that two steps of 2 tasks run side by side). Test equipment, not part of artune.
set -euo pipefail
CPUS=${CPUS:-8}
NODES=${NODES:-1}
command -v slurmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    slurmd slurmctld slurm-client munge >/dev/null
if [ -f /etc/slurm/slurm.conf ] && ! grep -q "^ClusterName=artunecheck$" /etc/slurm/slurm.conf \
        && [ -z "${FORCE:-}" ]; then
    echo "/etc/slurm/slurm.conf is not this script's (ClusterName=artunecheck): a real Slurm" \
        "may be set up here; FORCE=1 overwrites it" >&2
    exit 2
fi
H=$(hostname)
if [ "$NODES" -gt 1 ]; then
    NAMES=$(seq -f "n%g" 1 "$NODES" | paste -sd' ')
    SPOOL=/var/spool/slurmd-%n PID=/run/slurmd-%n.pid LOG=/var/log/slurmd-%n.log
else
    NAMES=$H SPOOL=/var/spool/slurmd PID=/run/slurmd.pid LOG=/var/log/slurmd.log
fi
{
cat <<CONF
ClusterName=artunecheck
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=$PID
SlurmdSpoolDir=$SPOOL
StateSaveLocation=/var/spool/slurmctld-artune
SlurmUser=root
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=$LOG
CONF
if [ "$NODES" -gt 1 ]; then
    i=0
    for n in $NAMES; do
        i=$((i + 1))
        echo "NodeName=$n NodeHostname=$H NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS State=UNKNOWN"
    done
else
    echo "NodeName=$H CPUs=$CPUS State=UNKNOWN"
fi
echo "PartitionName=debug Nodes=$(echo $NAMES | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} > /etc/slurm/slurm.conf
mkdir -p /var/spool/slurmctld-artune /run/munge /var/log/munge /etc/munge
for n in $NAMES; do mkdir -p "${SPOOL//%n/$n}"; done
if [ "$NODES" -gt 1 ] && ! grep -qx "127.0.0.1 $NAMES" /etc/hosts; then
    echo "127.0.0.1 $NAMES" >> /etc/hosts
fi
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
scontrol shutdown >/dev/null 2>&1 || true
pkill -x slurmd || true
for _ in $(seq 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
slurmctld
if [ "$NODES" -gt 1 ]; then for n in $NAMES; do slurmd -N "$n"; done; else slurmd; fi
sleep 3
sinfo -N -o "%N %c %T"
