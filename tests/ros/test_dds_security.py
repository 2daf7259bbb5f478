"""What SROS2 enclaves do with the ROS middleware installed here, checked rather than
assumed: a service runs in an enclave with ROS_SECURITY_STRATEGY=Enforce (keystore made
with openssl as `ros2 security create_keystore / create_enclave` would: identity and
permissions CA, the enclave's certificate, signed governance and permissions), and a
participant without security asks it. Either the middleware has no security plugins
and the enclaved process refuses to start (the PyPI Fast DDS: "This Fast DDS version
doesn't have the security libraries"), or it enforces them and the unauthenticated
participant never sees the service. Never: the service answers an unauthenticated
caller while security is on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

ENCLAVE = "/refvlm/secure_server"
GOVERNANCE = """<?xml version="1.0" encoding="UTF-8"?>
<dds><domain_access_rules><domain_rule>
  <domains><id_range><min>0</min><max>230</max></id_range></domains>
  <allow_unauthenticated_participants>false</allow_unauthenticated_participants>
  <enable_join_access_control>true</enable_join_access_control>
  <discovery_protection_kind>ENCRYPT</discovery_protection_kind>
  <liveliness_protection_kind>ENCRYPT</liveliness_protection_kind>
  <rtps_protection_kind>SIGN</rtps_protection_kind>
  <topic_access_rules><topic_rule><topic_expression>*</topic_expression>
    <enable_discovery_protection>true</enable_discovery_protection>
    <enable_liveliness_protection>true</enable_liveliness_protection>
    <enable_read_access_control>true</enable_read_access_control>
    <enable_write_access_control>true</enable_write_access_control>
    <metadata_protection_kind>ENCRYPT</metadata_protection_kind>
    <data_protection_kind>ENCRYPT</data_protection_kind>
  </topic_rule></topic_access_rules>
</domain_rule></domain_access_rules></dds>
"""
PERMISSIONS = f"""<?xml version="1.0" encoding="UTF-8"?>
<dds><permissions><grant name="{ENCLAVE}">
  <subject_name>CN={ENCLAVE}</subject_name>
  <validity><not_before>2020-01-01T00:00:00</not_before><not_after>2100-01-01T00:00:00</not_after></validity>
  <allow_rule><domains><id_range><min>0</min><max>230</max></id_range></domains>
    <publish><topics><topic>*</topic></topics></publish>
    <subscribe><topics><topic>*</topic></topics></subscribe></allow_rule>
  <default>DENY</default>
</grant></permissions></dds>
"""
SERVER = """
import sys, rclpy
from std_srvs.srv import Trigger
rclpy.init(args=sys.argv)
node = rclpy.create_node("secure_server")
node.create_service(Trigger, "/secure_trigger", lambda request, response: Trigger.Response(success=True))
print("serving", flush=True)
rclpy.spin(node)
"""


def make_keystore(root: Path) -> Path:
    """A keystore with one enclave, laid out as sros2 lays it out."""
    enclave = root / "enclaves" / ENCLAVE.strip("/")
    enclave.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key.pem")
    openssl("req", "-x509", "-new", "-key", "ca.key.pem", "-subj", "/CN=refvlm_test_ca", "-days", "2",
            "-out", "ca.cert.pem")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(enclave / "key.pem"))
    openssl("req", "-new", "-key", str(enclave / "key.pem"), "-subj", "/CN=" + ENCLAVE.replace("/", "\\/"),
            "-out", "enclave.csr")
    openssl("x509", "-req", "-in", "enclave.csr", "-CA", "ca.cert.pem", "-CAkey", "ca.key.pem",
            "-CAcreateserial", "-days", "2", "-out", str(enclave / "cert.pem"))
    for name in ("identity_ca.cert.pem", "permissions_ca.cert.pem"):
        shutil.copy(root / "ca.cert.pem", enclave / name)
    for name, text in (("governance", GOVERNANCE), ("permissions", PERMISSIONS)):
        (root / f"{name}.xml").write_text(text)
        openssl("smime", "-sign", "-in", f"{name}.xml", "-text", "-out", str(enclave / f"{name}.p7s"),
                "-signer", "ca.cert.pem", "-inkey", "ca.key.pem")
    return root


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a keystore")
def test_an_enforced_enclave_never_answers_an_unauthenticated_participant(tmp_path):
    from ros_client import SpinningClient
    from std_srvs.srv import Trigger

    keystore = make_keystore(tmp_path / "keys")
    env = dict(os.environ, ROS_SECURITY_KEYSTORE=str(keystore), ROS_SECURITY_ENABLE="true",
               ROS_SECURITY_STRATEGY="Enforce")
    server = subprocess.Popen([sys.executable, "-c", SERVER, "--ros-args", "--enclave", ENCLAVE], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = SpinningClient("unauthenticated_client")
    try:
        trigger = client.node.create_client(Trigger, "/secure_trigger")
        seen = trigger.wait_for_service(timeout_sec=15)
        answer = client.call(trigger, Trigger.Request(), timeout=10) if seen else None
    finally:
        client.close()
        if server.poll() is None:
            server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "Found security directory" in output, output   # rcl read the keystore
    assert answer is None, f"an unauthenticated participant was answered while security is enforced: {output}"
    if "doesn't have the security libraries" in output:
        assert server.returncode != 0 and "serving" not in output   # refuses to start: fails closed
        print("this middleware has no security plugins: an enforced enclave does not start")
    else:
        print("this middleware enforces the enclave: the unauthenticated participant saw no service")
