"""The HTTP edge every route shares: reading and validating bodies, server-sent
events, error bodies in each dialect's shape, auth, request ids, load
shedding and log setup.
"""
