"""The BPF_PROG_TEST_RUN testbed and its compiled loop, shared by tests, bench and fuzz."""
