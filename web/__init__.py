"""The web app: JSON API, Prometheus metrics, health and the dashboard (Flask, served by waitress)."""
