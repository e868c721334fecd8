"""Traces: storage of the TraceNode/TraceRoot model (core.trace) (files) and the HTTP server with its viewer."""
