"""The gateway: gRPC servicers (thin), interceptors (auth, errors, metrics), the
health service and the event hub that feeds WatchRender. It needs the store, never Ray."""
