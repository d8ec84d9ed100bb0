"""The featurepush server: gRPC servicers over a core of validation, online store and registry."""
