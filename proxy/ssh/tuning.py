"""Transport settings of both SSH legs, chosen for bulk throughput (figures in bench/ssh_proxy.py).

hoop decrypts every byte from the host and encrypts it again for the client, in Python with
asyncssh over the ``cryptography`` backend, so the cipher matters. asyncssh's AES-GCM is one
C call per packet (about 4.6 GB/s on the bench machine); its chacha20-poly1305 builds cipher
objects per packet (about 1 GB/s); AES-CTR with an encrypt-then-MAC is 1.2-2.7 GB/s.

* Upstream (hoop is the client, so hoop's order wins): AES-GCM first, then the rest.
* Client-facing (the client's order wins): chacha20-poly1305 is not offered, because OpenSSH
  clients list it first and would always pick it; they then take AES-CTR (or AES-GCM on
  OpenSSH >= 9.9). Every SSH client of the last decade has AES.
* Compression: none on the upstream leg (a client asking ``-C`` still gets zlib from hoop).
* Channels to the host accept packets of up to 256 KiB (OpenSSH sends larger packets when
  its buffer has more), so there are fewer packets to decrypt and relay. The window stays at
  asyncssh's 2 MiB: while a client reads slowly, up to a window per channel waits in hoop.
"""

from __future__ import annotations

__all__ = ["CLIENT_FACING_CIPHERS", "UPSTREAM_CIPHERS", "UPSTREAM_COMPRESSION", "UPSTREAM_MAX_PKTSIZE",
           "UPSTREAM_WINDOW"]

#: Offered to clients (their preference wins): no chacha20-poly1305, see the module docstring.
CLIENT_FACING_CIPHERS: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                          "aes128-ctr", "aes192-ctr", "aes256-ctr")
#: hoop's preference towards hosts.
UPSTREAM_CIPHERS: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                     "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
UPSTREAM_COMPRESSION: tuple[str, ...] = ("none",)
#: Receive window and largest packet hoop accepts on channels to the host.
UPSTREAM_WINDOW = 2 << 20
UPSTREAM_MAX_PKTSIZE = 256 << 10
