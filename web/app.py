"""Flask app factory: blueprints, JSON errors, security headers and rate limits."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException

from fleet.config.settings import Settings
from fleet.web import (
    alerts_api,
    api,
    audit_api,
    channels_api,
    config_api,
    dashboard,
    enrol_api,
    health,
    invite,
    machines_api,
    metrics,
    oidc,
    people_api,
    rules_api,
    session,
    silences_api,
    tokens_api,
)
from fleet.web.db import DatabaseUnavailable, close_db, pool_for, write_pool_for

log = logging.getLogger("fleet.web")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _security_headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.path.startswith("/api/") or request.path in ("/metrics", "/healthz"):
        response.headers["Cache-Control"] = "no-store"
    return response


def _json_error(exc: HTTPException):
    if exc.response is not None:  # abort(response): the view built the answer itself
        return exc.response
    response = jsonify({"error": exc.description or exc.name, "status": exc.code})
    response.status_code = exc.code or 500
    if exc.code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="fleet"'
    if exc.code == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def create_app(settings: Settings, **overrides) -> Flask:
    """Build the web app for ``settings``; ``overrides`` go into app.config (tests)."""
    app = Flask(__name__)
    app.config.update(FLEET_SETTINGS=settings, FLEET_DB_POOL=pool_for(settings),
                      FLEET_DB_WRITE_POOL=write_pool_for(settings), JSON_SORT_KEYS=False,
                      MAX_CONTENT_LENGTH=64 * 1024, RATELIMIT_HEADERS_ENABLED=True)
    app.config.update(overrides)
    limiter = Limiter(get_remote_address, app=app, default_limits=[settings.rate_limit_api],
                      storage_uri="memory://", strategy="fixed-window")
    app.register_blueprint(config_api.bp)
    limiter.limit(settings.rate_limit_config)(config_api.bp)
    app.register_blueprint(session.signin_bp)
    for key in (session.address_key, session.account_key):  # failed sign-ins, per address and per account
        limiter.limit(session.SIGN_IN_LIMIT, key_func=key, methods=["POST"], deduct_when=session.failed,
                      override_defaults=False, error_message=session.LIMITED)(session.signin_bp)
    for blueprint in (api.bp, alerts_api.bp, metrics.bp, health.bp, dashboard.bp, session.bp, invite.bp,
                      tokens_api.bp, audit_api.bp, people_api.bp, oidc.bp):
        app.register_blueprint(blueprint)
    for blueprint in (silences_api.bp, rules_api.bp, channels_api.bp, enrol_api.bp, machines_api.bp):
        app.register_blueprint(blueprint)
    session.warm_up()
    app.teardown_appcontext(close_db)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _json_error)

    @app.errorhandler(DatabaseUnavailable)
    def _database_unavailable(exc: DatabaseUnavailable):
        return jsonify({"error": str(exc), "status": 503}), 503

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # The endpoint, not the path: a path may hold a secret (a sign-in link's token).
        log.exception("unexpected error on %s %s", request.method, request.endpoint)
        return jsonify({"error": "internal error", "status": 500}), 500

    return app
