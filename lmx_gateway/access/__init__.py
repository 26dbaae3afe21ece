"""Who may call what. `scopes.ScopedRoute` is the only kind of route the app
takes; each declares its scope (PUBLIC / INFERENCE / ADMIN), and `guards`
checks the browser Origin and the scope's key (`auth`) before the handler.
`edge` holds the Host check (421, against DNS rebinding) and the CORS
middleware for `server.cors_origins`. To add a route, put one line in its
module's ROUTES list:

    ScopedRoute(ADMIN, "/admin/models/restart", restart, methods=["POST"], body=RestartRequest)

and it is guarded, documented in `GET /openapi.json` and fuzzed.
"""
