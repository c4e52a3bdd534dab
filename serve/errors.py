"""What the service answers with a status and one sentence instead of a result."""


class Refused(ValueError):
    """A request the runner refused (ValueError), that names no served model or job, or that the service cannot
    take now: `status` is the HTTP status (400, 404, 429), the message its one sentence."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
