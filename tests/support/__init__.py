"""Test support: real servers on loopback (PostgreSQL, sshd), fakes of hoop's interfaces."""
