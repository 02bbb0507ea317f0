"""MetaSchedule tuning at static size buckets: databases, builders/runners, the tuning loop."""
