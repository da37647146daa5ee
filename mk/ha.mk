# High availability on Pacemaker (README "High availability"):
#   make setup     also installs the OCF agents ocf:nbd-mc:{replica,protect,qemu}
#                  (tools/setup-ha.sh: wrappers that run ha/*.py with this venv)
#   make demo-ha   two Pacemaker nodes on this machine (network + mount namespaces),
#                  a protected VM, kill -9 of the primary, failover by Pacemaker,
#                  failback by checksum sync (it prints failover times and resync bytes)
.PHONY: ha-agents demo-ha
setup: ha-agents
ha-agents: $(STAMP)
	@tools/setup-ha.sh $(CURDIR)/$(PY) $(CURDIR)

demo-ha: setup guest
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) ha/demo.py $(DEMO_HA_ARGS)
