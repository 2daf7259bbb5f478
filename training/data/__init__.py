"""VT-Instruct data: the sample schema, tar shards, the streaming loader, task templates
and builders, converters from public datasets, and tools to look at data."""
