"""Lab: real VPN peers in network namespaces, for the demo and the end-to-end tests.

Nothing here is imported by the daemon. Modules:

* :mod:`vpnmasq_lab.topology`   namespaces, veths, bridges, routes; process tracking; kernel NAT
* :mod:`vpnmasq_lab.pppstub`    async-HDLC PPP stand-in (no kernel PPP here) for pptpd and pptp
* :mod:`vpnmasq_lab.pptp_client` drives ``pptp --nolaunchpppd`` and checks echoed frames
* :mod:`vpnmasq_lab.pptp_server` runs PoPToP ``pptpd`` with the stub as its ``ppp`` program
* :mod:`vpnmasq_lab.strongswan` one charon (kernel-libipsec) per namespace, driven by swanctl
* :mod:`vpnmasq_lab.rawpeers`   scapy raw ESP (proto 50) and ISAKMP (udp/500) peers
* :mod:`vpnmasq_lab.plain`      ICMP pinger, TCP/UDP echo server and client, HTTP/1.0-ish web
* :mod:`vpnmasq_lab.gateway`    ``vpnmasq run`` as the lab gateway (``Topology.gateway_vpnmasq``)
* :mod:`vpnmasq_lab.pcap`       reads the gateway's captures (ports, SPIs, GRE Call IDs on wan0)
* :mod:`vpnmasq_lab.demo`       ``vpnmasq demo``: the sessions through vpnmasq, then the kernel

Facts learnt while building these are in ``README-lab.md`` next to this file.
"""
