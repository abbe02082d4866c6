"""Workstation tools around the daemon, for the sim, the tests and the benchmarks: a systemd-like
supervisor for a daemon in a child process (`supervise`), load generation (`load`). Not in the robot's
wheel: nothing under runtime/ imports them."""
