"""Starting and stopping ``tritonserver``: ports, PID records, processes, shared memory and logs."""
