# The KVM bindings are a cffi extension compiled against <linux/kvm.h>;
# setuptools needs setup.py to hand it to cffi's build hook.
from setuptools import setup

setup(cffi_modules=["vmm/kvm/_build.py:ffibuilder"])
