"""Device code and its launchers (Triton kernels calling NVSHMEM device functions).

Nothing here is imported by ``import artune``: the kernel modules import Triton at module level
and are loaded by the backends that use them (``artune.backends.nvrar``).

- ``nvrar_prims``   device helpers: clock, fences, bounded waits, word packing, error words
- ``nvrar_oneshot`` NVRAR's one-shot low-latency (LL) kernel for small messages on one node
- ``nvrar_hier``    NVRAR's reduce-scatter / recursive-doubling / all-gather kernel
- ``nvrar_shmem``   NVSHMEM device functions bound for Triton (inter-node puts)
- ``nvrar_layout``  the symmetric-buffer layout and launch geometry (pure Python)
- ``nvrar``         the host side: buffers, peer pointers, launches, error checks
"""
