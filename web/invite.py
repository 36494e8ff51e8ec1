"""``/invite/<token>``: the page of a sign-in link, where an invited person chooses a password.

A plain HTML form (no script, so the strict CSP holds); the link's token is the form's only credential and is
used up when the password is set. The person is then signed in and sent to the dashboard.
"""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, make_response, redirect, render_template, request

from fleet.store import people
from fleet.store.errors import PeopleError
from fleet.web import db
from fleet.web.session import begin_session, session_body

log = logging.getLogger("fleet.web")
bp = Blueprint("invite", __name__)
_TOKEN_MAX = 128


def _page(token: str, error: str = "", status: int = 200, email: str = ""):
    response = make_response(render_template("invite.html", token=token, error=error, email=email,
                                             min_length=people.PASSWORD_MIN), status)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/invite/<token>")
def invitation(token: str):
    """The password form of a valid sign-in link; a page saying so (404) for a used or expired one."""
    person = db.read(lambda conn: people.invitation_person(conn, token)) if len(token) <= _TOKEN_MAX else None
    if person is None:
        return _page("", "This sign-in link is not valid: it was used, replaced or is over 24 hours old."
                         " Ask an admin for a new one.", 404)
    return _page(token, email=person.email)


@bp.post("/invite/<token>")
def accept(token: str):
    """Set the password, use the link up, sign the person in and go to the dashboard.

    The page's form posts ``password`` and ``confirm``; a script may post JSON ``{"password"}`` instead and gets
    the ``/api/session`` answer (or a JSON error).
    """
    as_json = request.is_json
    body = request.get_json(silent=True) if as_json else request.form.to_dict()
    if not isinstance(body, dict):
        body = {}
    password = body.get("password")
    confirm = body.get("confirm", password)
    try:
        if not isinstance(password, str) or not isinstance(confirm, str):
            raise PeopleError("send the new password")
        if password != confirm:
            raise PeopleError("the two passwords differ")
        if len(token) > _TOKEN_MAX:
            raise PeopleError("this sign-in link is not valid")
        people.check_password(password)
        person = db.write(lambda conn: people.accept_invitation(conn, token, password))
    except PeopleError as exc:
        if as_json:
            return jsonify({"error": str(exc), "status": 400}), 400
        still_valid = len(token) <= _TOKEN_MAX and db.read(lambda conn: people.invitation_person(conn, token))
        return _page(token if still_valid else "", str(exc).capitalize() + ".", 400)
    log.info("password chosen through a sign-in link: %s", person.email)
    response = jsonify({}) if as_json else redirect("/", code=303)
    csrf = begin_session(response, person)
    if as_json:
        response.set_data(jsonify(session_body(person, csrf)).get_data())
    return response
