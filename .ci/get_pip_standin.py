"""Offline stand-in for the get-pip.py script that ansible-test downloads to bootstrap its venvs.

multipush-get-pip-standin (marker: ./dev sanity only replaces cached copies that carry it)

ansible-test runs the cached script (~/.ansible/test/cache/get_pip_<pip version>.py) inside a fresh
virtual environment with the arguments it would give get-pip.py, for example
``--disable-pip-version-check pip==24.2 --no-setuptools --no-wheel``. The real script is downloaded
from a host that this network does not reach. This stand-in bootstraps pip from the standard
library's ensurepip instead, then lets that pip install what was asked for (the exact pip version)
from the package index that pip is configured for. ``./dev sanity`` copies it into the cache.
"""

import os
import subprocess
import sys

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GET_PIP_ONLY_OPTIONS = ("--no-setuptools", "--no-wheel")


def main():
    # ensurepip installs the pip bundled with this Python, without any network access.
    bootstrap = subprocess.run(
        [sys.executable, "-m", "ensurepip", "--default-pip"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        universal_newlines=True,
        check=False,
    )
    if bootstrap.returncode != 0:
        sys.stderr.write(bootstrap.stdout)
        return bootstrap.returncode
    args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_OPTIONS]
    if not args:
        return 0
    command = [sys.executable, "-m", "pip", "install", "--quiet"]
    if os.path.exists(CA_BUNDLE):
        command += ["--cert", CA_BUNDLE]
    return subprocess.call(command + args)


if __name__ == "__main__":
    sys.exit(main())
