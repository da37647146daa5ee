# make install-units [DESTDIR=/] [UNITDIR=/etc/systemd/system] [NBD_MC_BIN=path]
# Installs systemd/nbd-mc-serve@.service and systemd/nbd-mc-protect@.service with
# ExecStart pointing at NBD_MC_BIN (default: this checkout's .venv/bin/nbd-mc), and
# the documented settings file as /etc/nbd-mc/nbd-mc.conf.example.  Then:
#   cp /etc/nbd-mc/nbd-mc.conf.example /etc/nbd-mc/vm1.conf  (edit it)
#   systemctl enable --now nbd-mc-serve@vm1    (secondary)
#   systemctl enable --now nbd-mc-protect@vm1  (primary)
UNITDIR ?= /etc/systemd/system
NBD_MC_BIN ?= $(CURDIR)/$(VENV)/bin/nbd-mc
UNITS := nbd-mc-serve@.service nbd-mc-protect@.service

.PHONY: install-units
install-units:
	@install -d -m 755 $(DESTDIR)$(UNITDIR) $(DESTDIR)/etc/nbd-mc
	@for u in $(UNITS); do \
	  sed 's|@NBD_MC@|$(NBD_MC_BIN)|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u.tmp && \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$u.tmp && mv $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u; \
	done
	@install -m 644 systemd/nbd-mc.conf.example $(DESTDIR)/etc/nbd-mc/nbd-mc.conf.example
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $(UNITS) in $(DESTDIR)$(UNITDIR) (ExecStart $(NBD_MC_BIN))"
