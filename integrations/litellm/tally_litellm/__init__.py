"""tally for LiteLLM: shared budgets, rate limits and key rules for every proxy replica.

In the proxy's config.yaml:

    litellm_settings:
      callbacks: tally_litellm.callback

`callback` is a TallyLogger configured from the environment (TALLY_URL, TALLY_TOKEN, ...);
build your own `TallyLogger(url=..., mapping=...)` in a module of yours for other settings.
"""

from .logger import TallyLogger, deny_status
from .settings import Settings
from .usage import attributes, token_kinds

__all__ = ["TallyLogger", "Settings", "attributes", "token_kinds", "deny_status", "callback"]

# Creating it starts nothing: the sender thread starts with the first usage record.
callback = TallyLogger()
