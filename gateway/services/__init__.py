"""What the routes do, apart from HTTP: the job service and the parts it runs with."""
