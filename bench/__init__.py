"""`make bench`: featurepush against a real server process, next to ceilings measured in the same run."""
