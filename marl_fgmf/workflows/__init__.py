"""What the commands call when the work runs on Ray: jobs that take shipped weights."""
