"""What the service answers with a status and one sentence instead of a result."""


class Refused(ValueError):
    """A request the replica will not or could not serve: the runner's refusal (400), no such model or job (404),
    too many jobs (429), a passed deadline (504). `status` is the HTTP status, the message its one sentence."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
