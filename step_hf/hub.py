"""Uploads to the Hugging Face Hub that cannot hang, with errors that name the repository and the host.

huggingface_hub's shared HTTP client has no timeout: a Hub that accepts the connection and never answers blocks
`create_repo`, `upload_folder` and transformers' `push_to_hub` forever, and a dropped connection surfaces as
"Server disconnected" with neither the host nor the repository. `hub_timeout` bounds every request made inside it
(huggingface_hub's `set_client_factory`, the client's connect, read and write timeouts) and turns a network or Hub
failure into a `HubError` that names the repository, the host, the cause and how to retry.

    python -m step_hf.hub FOLDER org/name [--exclude "checkpoints/*"]     # upload a saved folder

Large files that huggingface_hub sends through Xet (`hf_xet`) use that library's own transfer client and retries;
the requests around them (repository, pre-upload, commit) are bounded here.
"""

import argparse
import os
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx2
from huggingface_hub import HfApi, constants, set_client_factory
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http

# Per request, between bytes: a slow but moving upload never hits it, a Hub that stopped answering does.
HUB_TIMEOUT_SECONDS = 60.0
TIMEOUT_VARIABLE = "STEP_HF_HUB_TIMEOUT"


class HubError(RuntimeError):
    """A Hub request failed or did not answer in time; the message names the repository, host and a retry (also
    as attributes: `repo_id`, `host`, `cause`)."""

    def __init__(self, message: str, repo_id: str | None, host: str, cause: str):
        super().__init__(message)
        self.repo_id, self.host, self.cause = repo_id, host, cause


def default_timeout() -> float:
    """`STEP_HF_HUB_TIMEOUT` (seconds) if set, else `HUB_TIMEOUT_SECONDS`."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return HUB_TIMEOUT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_VARIABLE}={value!r} must be a positive number of seconds.")
    return seconds


@contextmanager
def hub_timeout(seconds: float | None = None, repo_id: str | None = None, doing: str = "reach",
                retry: str | None = None) -> Iterator[None]:
    """
    Bound every huggingface_hub request made inside the block to `seconds` (default `default_timeout()`) of
    silence, and raise `HubError` naming `repo_id`, the host and the cause for a timeout, a dropped connection or a
    Hub error; `retry` is added to the message (what to run again). Wraps transformers' `push_to_hub` too:

        with hub_timeout(repo_id="org/name", doing="push to"):
            model.push_to_hub("org/name")
    """
    seconds = default_timeout() if seconds is None else seconds
    # The factory in force (the user's own, for proxies or certificates, or the default) gets a timeout added;
    # huggingface_hub has a setter for it but no getter.
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def bounded_client() -> httpx2.Client:
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(bounded_client)
    try:
        yield
    except (httpx2.HTTPError, HfHubHTTPError, ConnectionError) as error:
        target = f"the Hub repository {repo_id}" if repo_id else "the Hub"
        cause = failure(error, seconds)
        raise HubError(f"Could not {doing} {target} at {constants.ENDPOINT}: {cause}.{' ' + retry if retry else ''}",
                       repo_id, constants.ENDPOINT, cause) from error
    finally:
        set_client_factory(previous)


def failure(error: Exception, seconds: float) -> str:
    """What went wrong, in words: a timeout, a dropped connection, or the Hub's own answer."""
    if isinstance(error, httpx2.TimeoutException):
        return (f"no answer within {seconds:g} s ({type(error).__name__}; set {TIMEOUT_VARIABLE} to wait longer per "
                "request)")
    if isinstance(error, (httpx2.RemoteProtocolError, httpx2.NetworkError)):
        return f"the connection failed or dropped ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def create_repository(repo_id: str, timeout: float | None = None, private: bool | None = None) -> str:
    """Create the model repository `repo_id` (or find it), within bounded waits; returns its URL."""
    with hub_timeout(timeout, repo_id, "create or find"):
        return str(HfApi().create_repo(repo_id, exist_ok=True, private=private))


def push_folder(folder: str, repo_id: str, ignore_patterns: Sequence[str] = (), timeout: float | None = None,
                create: bool = True) -> str:
    """
    Upload `folder` (all of it but `ignore_patterns`) to the model repository `repo_id` in one commit, creating the
    repository first unless `create` is false; returns the commit URL. Nothing local is changed: on failure the
    `HubError` says the folder is intact and gives the command that uploads it again.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder: save the model there first (`save_pretrained`).")
    command = ["python", "-m", "step_hf.hub", folder, repo_id]
    for pattern in ignore_patterns:
        command += ["--exclude", pattern]
    retry = (f"The local folder {folder} is complete and unchanged. A commit is all or nothing, so uploading again "
             f"is safe: {shlex.join(command)}")
    with hub_timeout(timeout, repo_id, "upload to", retry):
        if create:
            HfApi().create_repo(repo_id, exist_ok=True)
        commit = HfApi().upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=list(ignore_patterns))
    return str(commit.commit_url)


__all__ = ["HUB_TIMEOUT_SECONDS", "HubError", "create_repository", "hub_timeout", "push_folder"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Upload a saved step-hf folder to the Hub, with bounded waits.")
    parser.add_argument("folder")
    parser.add_argument("repo_id", help="org/name")
    parser.add_argument("--exclude", action="append", default=[], help="a glob left out (repeatable)")
    parser.add_argument("--timeout", type=float, help=f"seconds of silence per request (default: ${TIMEOUT_VARIABLE} "
                                                      f"or {HUB_TIMEOUT_SECONDS:g})")
    args = parser.parse_args(argv)
    try:
        url = push_folder(args.folder, args.repo_id, args.exclude, args.timeout)
    except HubError as error:
        parser.exit(1, f"{error}\n")
    print(f"pushed {args.folder} to {args.repo_id} ({url})")


if __name__ == "__main__":
    main()

