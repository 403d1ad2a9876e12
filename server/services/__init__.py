"""Business logic behind the routes: keyword-only functions that flush; the request commits."""
