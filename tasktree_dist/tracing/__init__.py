"""Traces: the TraceNode/TraceRoot model, their storage (files) and the HTTP server with its viewer."""
