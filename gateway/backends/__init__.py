"""What runs a job's inference: the backend protocol and its Triton client, pool and served-weights probe."""
