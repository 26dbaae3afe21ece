"""One model in one OS process: a backend engine driven by a step loop, talking
to the supervisor over a ZeroMQ DEALER socket. No HTTP here."""
