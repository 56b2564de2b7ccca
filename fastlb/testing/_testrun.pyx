# cython: language_level=3
"""BPF_PROG_TEST_RUN from compiled code.

A Python-level loop costs about 1 us per call, which would swamp a program
that runs in tens of nanoseconds, and a ``repeat > 1`` call times a rewritten
packet on its own output (the kernel does not reset the buffer between
repetitions). ``time_calls`` therefore makes many calls of ``repeat = 1`` from
C with the GIL released, and can give every call a fresh 5-tuple by bumping a
big-endian counter inside the packet.

The attribute block mirrors the ``test`` member of the kernel's
``union bpf_attr`` (include/uapi/linux/bpf.h); the tail the kernel does not
know must be zero, so the block is zeroed before every use.
"""

from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from "<sys/syscall.h>":
    long SYS_bpf

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

DEF BPF_PROG_TEST_RUN = 10

# Flags of the test command.
BPF_F_TEST_XDP_LIVE_FRAMES = 2

cdef struct test_attr:
    uint32_t prog_fd
    uint32_t retval
    uint32_t data_size_in
    uint32_t data_size_out
    uint64_t data_in
    uint64_t data_out
    uint32_t repeat
    uint32_t duration
    uint32_t ctx_size_in
    uint32_t ctx_size_out
    uint64_t ctx_in
    uint64_t ctx_out
    uint32_t flags
    uint32_t cpu
    uint32_t batch_size
    uint32_t pad

# struct xdp_md (include/uapi/linux/bpf.h): the context a test run may pass in.
cdef struct xdp_md:
    uint32_t data
    uint32_t data_end
    uint32_t data_meta
    uint32_t ingress_ifindex
    uint32_t rx_queue_index
    uint32_t egress_ifindex

cdef inline long _test_run(test_attr *attr) noexcept nogil:
    return syscall(SYS_bpf, BPF_PROG_TEST_RUN, attr, sizeof(test_attr))


def run(int prog_fd, bytes data, unsigned int repeat=1, unsigned int flags=0,
        unsigned int batch_size=0, int out_size=-1, unsigned int ingress_ifindex=0):
    """Run the program once (``repeat`` times) on ``data``.

    Returns ``(retval, output bytes, duration ns per repetition)``. With
    ``flags=BPF_F_TEST_XDP_LIVE_FRAMES`` the frames really leave (a traffic
    generator) and no output is returned. ``ingress_ifindex`` (a device of
    this network namespace) makes the frame arrive on that device instead of
    lo, so that ``bpf_check_mtu()`` measures against its MTU.
    """
    cdef test_attr attr
    cdef xdp_md ctx
    cdef Py_ssize_t n = len(data)
    cdef Py_ssize_t cap = (n + 512) if out_size < 0 else out_size
    cdef uint8_t *out = NULL
    cdef const uint8_t[:] view = data
    cdef long rc
    live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
    if not live:
        out = <uint8_t *>malloc(cap if cap > 0 else 1)
        if out == NULL:
            raise MemoryError()
    try:
        memset(&attr, 0, sizeof(attr))
        attr.prog_fd = prog_fd
        attr.data_in = <uint64_t>&view[0]
        attr.data_size_in = n
        if not live:
            attr.data_out = <uint64_t>out
            attr.data_size_out = cap
        attr.repeat = repeat
        attr.flags = flags
        attr.batch_size = batch_size
        if ingress_ifindex:
            memset(&ctx, 0, sizeof(ctx))
            ctx.data_end = <uint32_t>n      # the kernel requires data 0, data_end the frame's length
            ctx.ingress_ifindex = ingress_ifindex
            attr.ctx_in = <uint64_t>&ctx
            attr.ctx_size_in = sizeof(ctx)
        with nogil:
            rc = _test_run(&attr)
        if rc < 0:
            raise OSError(errno, "BPF_PROG_TEST_RUN failed")
        if live:
            return attr.retval, b"", attr.duration
        return attr.retval, bytes(out[:min(<Py_ssize_t>attr.data_size_out, cap)]), attr.duration
    finally:
        if out != NULL:
            free(out)


def time_calls(int prog_fd, bytes data, unsigned long calls, int vary_offset=-1,
               int vary_len=4):
    """Make ``calls`` separate calls of repeat=1 from C.

    ``vary_offset`` >= 0 names a big-endian counter of ``vary_len`` bytes
    (1..4) in the packet that is incremented before each call, so each call
    sees a new flow. Returns ``(mean kernel ns per call, mean wall ns per
    call, retval of the last call)``.
    """
    cdef test_attr attr
    cdef Py_ssize_t n = len(data)
    cdef uint8_t *buf = <uint8_t *>malloc(n if n > 0 else 1)
    cdef unsigned long i
    cdef uint64_t total = 0
    cdef uint32_t counter = 0
    cdef int k
    cdef long rc = 0
    cdef int err = 0
    cdef timespec t0, t1
    if buf == NULL:
        raise MemoryError()
    if vary_offset >= 0 and (vary_len < 1 or vary_len > 4 or vary_offset + vary_len > n):
        free(buf)
        raise ValueError("vary_offset/vary_len fall outside the packet")
    memcpy(buf, <const char *>data, n)
    if vary_offset >= 0:
        for k in range(vary_len):
            counter = (counter << 8) | buf[vary_offset + k]
    try:
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &t0)
            for i in range(calls):
                if vary_offset >= 0:
                    counter += 1
                    for k in range(vary_len):
                        buf[vary_offset + vary_len - 1 - k] = (counter >> (8 * k)) & 0xff
                memset(&attr, 0, sizeof(attr))
                attr.prog_fd = prog_fd
                attr.data_in = <uint64_t>buf
                attr.data_size_in = n
                attr.repeat = 1
                rc = _test_run(&attr)
                if rc < 0:
                    err = errno
                    break
                total += attr.duration
            clock_gettime(CLOCK_MONOTONIC, &t1)
        if rc < 0:
            raise OSError(err, "BPF_PROG_TEST_RUN failed")
        wall = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)
        return total / calls if calls else 0.0, wall / calls if calls else 0.0, attr.retval
    finally:
        free(buf)
