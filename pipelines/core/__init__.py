"""What every stage shares: configs, storage, manifests, parts and commits, the data schema, images."""
