"""pytest-nestedkvm: pytest fixtures that boot nested KVM guests (L1, L2, ...) for hypervisor tests."""

__version__ = "0.1.0"
