# make certs DIR=path [NAMES="host.example 10.0.0.2"] [FORCE=1]
# An x509 directory for nbdkit --tls-certificates, QEMU tls-creds-x509 and the
# nbd-mc control channel over TCP (see tools/make-certs.sh).
.PHONY: certs
certs:
	@test -n "$(DIR)" || { echo 'usage: make certs DIR=directory [NAMES="name ..."] [FORCE=1]' >&2; exit 2; }
	@tools/make-certs.sh $(if $(FORCE),--force) "$(DIR)" $(NAMES)
	@echo "certificates in $(DIR)"
