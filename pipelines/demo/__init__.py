"""`make demo`: the embedded web, S3 server and synthetic data, and the demo run. Not needed by the stages."""
