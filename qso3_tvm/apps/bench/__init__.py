"""`qso3-tvm bench`: every inference route side by side, each in its own process."""
