"""gateway: the mail daemon on a support desk's address.

It accepts mail over SMTP/LMTP for the configured mailboxes only, stores each message
durably before answering 250, and never loses an acknowledged message.
"""

__version__ = "0.1.0"
