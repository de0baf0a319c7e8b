"""Builds dlm_client with its message classes generated from the agent's
.proto (dlm-proto/proto/dlm/v1/dlm.proto, from the repository's root) by
grpc_tools' protoc."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "..", "dlm-proto", "proto", "dlm", "v1")


class BuildWithMessages(build_py):
    def run(self):
        from grpc_tools import protoc

        out = os.path.join(HERE, "dlm_client")
        if protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", os.path.join(PROTO_DIR, "dlm.proto")]) != 0:
            raise RuntimeError("protoc could not compile dlm.proto")
        super().run()


setup(cmdclass={"build_py": BuildWithMessages})
