"""IPython kernel configuration for the notebooks that the docs build executes (see docs/conf.py).

The kernels run on the build machine and talk to it over local TCP sockets. ipykernel says at
start-up that those sockets are not encrypted; in a build log that notice reads like a problem
with the docs, so it is filtered out here. Every other message of the kernel still shows.
"""

import logging

c = get_config()  # noqa: F821 (defined by IPython when it loads this file)
c.HistoryManager.enabled = False  # a build keeps no command history


class _NoUnencryptedTransportNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "running over TCP without encryption" not in record.getMessage()


logging.getLogger("IPKernelApp").addFilter(_NoUnencryptedTransportNotice())
