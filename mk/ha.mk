# High availability on Pacemaker (README "High availability"):
#   make setup     also installs the OCF agents ocf:nbd-mc:{replica,protect,qemu}
#                  (tools/setup-ha.sh: wrappers that run ha/*.py with this venv)
#   make demo-ha   two Pacemaker nodes on this machine (network + mount namespaces),
#                  a protected VM, kill -9 of the primary, failover by Pacemaker,
#                  failback by checksum sync (it prints failover times and resync bytes)
#   make demo-ha3  three nodes, three protected VMs placed as a ring (ha/cluster3.crm),
#                  one node killed and returning (per VM: kill -> running, return ->
#                  protected again)
.PHONY: ha-agents demo-ha demo-ha3
setup: ha-agents
ha-agents: $(STAMP)
	@tools/setup-ha.sh $(CURDIR)/$(PY) $(CURDIR)

demo-ha: setup guest
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) ha/demo.py $(DEMO_HA_ARGS)

demo-ha3: setup guest
	PATH=$(CURDIR)/$(VENV)/bin:/usr/bin:$$PATH $(PY) ha/demo.py --three $(DEMO_HA_ARGS)
