"""One exception tree. The library raises these; the CLI prints one line and exits 2."""


class NsdedgeError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class InputError(NsdedgeError):
    """A user file (voxels, weights, decoder) is missing, unreadable or malformed."""


class WeightsError(InputError):
    """A weight file has the wrong keys or shapes."""


class BundleError(NsdedgeError):
    """A bundle is missing, incomplete, corrupted or of an unknown schema."""


class ParityError(NsdedgeError):
    """An exported graph does not reproduce its source module within tolerance."""


class ProviderError(NsdedgeError):
    """An execution provider was asked for but is not available."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else type(e).__name__)[:limit]


def torch_weights(path) -> object:
    """torch.load(weights_only=True) of a user's file, with torch's warnings about the file kept from the user
    (e.g. an old pickle protocol): it is read or refused, and a refusal is one line (torch_load_error)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=True)


def torch_load_error(e: BaseException) -> str:
    """Why a weights-only torch.load failed, in words: objects other than tensors in the pickle (never run; not
    torch's advice to load it unsafely), or not a torch weights file at all (a git-lfs pointer, a web page, ...)."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        after = str(e).split("WeightsUnpickler error:", 1)[-1]
        reason = next((ln.strip() for ln in after.splitlines() if ln.strip()), type(e).__name__)[:120]
        if "Unsupported global" in reason:
            return f"it pickles objects other than tensors ({reason}), which nsdedge never loads"
        return f"not a weights-only torch file ({reason}); nsdedge never loads anything else"
    return f"{type(e).__name__}: {first_line(e)}"
