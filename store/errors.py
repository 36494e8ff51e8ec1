"""Error root of the store package: the database cannot serve, or an org or credential operation failed."""


class StoreError(Exception):
    """Root of every error raised by the store package."""


class DatabaseError(StoreError):
    """The database cannot be opened, queried or migrated; the message is one line."""


class DatabaseBusy(DatabaseError):
    """A transient failure: locked, busy, a conflict, or the server is unreachable or restarting. Retry later."""


class DatabaseRefused(DatabaseError):
    """The database refused the data itself (a value out of range, a constraint): retrying cannot help."""


class CredentialError(StoreError):
    """An org or credential operation failed (unknown org, duplicate org, bad role, the wrong pepper)."""


class PeopleError(StoreError):
    """A person, role, password, invitation, session or token operation failed; the message is one line."""


class NotFound(StoreError):
    """The org has no such thing (rule, channel, silence, alert, token, machine): the web answers 404."""
