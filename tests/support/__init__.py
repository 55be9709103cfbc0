"""What the tests share: fixture files, synthetic clips and decode bombs, free ports, the gateway and
PostgreSQL processes they start, an in-process gateway on a stand-in backend, webhook receivers."""
