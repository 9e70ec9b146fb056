"""The two ways to run the kernel paths: real processes (cluster/) and scheduled tasks (explore, virtual time)."""
