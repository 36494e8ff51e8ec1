"""The shared database: the engine seam, schema and migrations, and the stores of orgs, keys and alerting."""
