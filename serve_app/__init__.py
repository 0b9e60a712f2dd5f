"""lorafleet.serve_app: the Ray Serve application (`serve_app.app`) and its plain-Python engine (`serve_app.engine`)."""
