"""Drives headless Chromium browsers for the web phone's tests.

Reads one JSON command per line on stdin and answers each with one JSON
line on stdout: {"ok": value} or {"error": "..."}. The test (Rust) says
what to do; this only turns commands into WebDriver calls, so the test's
logic stays in one place. Commands:

  {"op": "start", "name": "a"}                 a new browser (its own profile)
  {"op": "get", "name": "a", "url": "..."}
  {"op": "type", "name": "a", "id": "peer", "text": "bob"}
  {"op": "click", "name": "a", "id": "call"}
  {"op": "eval", "name": "a", "js": "return phone.state"}   (promises are awaited)
  {"op": "wait", "name": "a", "js": "return phone.state === 'talking'", "timeout": 20}
  {"op": "screenshot", "name": "a", "path": "..."}
  {"op": "logs", "name": "a"}                  the page's console messages
  {"op": "quit"}

The browsers get a fake camera (Chromium's test pattern), media permission
without asking, and loopback ICE candidates, so two pages on one machine
can call each other with no network. Every browser ends when stdin closes.
"""

import argparse
import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def browser(chromium, chromedriver):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=900,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver: Selenium Manager never downloads one.
    return webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    browsers = {}
    try:
        print(json.dumps({"ok": "ready"}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "quit":
                    print(json.dumps({"ok": None}), flush=True)
                    break
                if op == "start":
                    browsers[cmd["name"]] = browser(args.chromium, args.chromedriver)
                    result = None
                else:
                    b = browsers[cmd["name"]]
                    result = run(b, op, cmd)
                print(json.dumps({"ok": result}), flush=True)
            except Exception as e:  # the test sees what went wrong
                print(json.dumps({"error": f"{op}: {type(e).__name__}: {e}"}), flush=True)
    finally:
        for b in browsers.values():
            b.quit()


def run(b, op, cmd):
    if op == "get":
        b.get(cmd["url"])
    elif op == "type":
        el = b.find_element(By.ID, cmd["id"])
        el.clear()
        el.send_keys(cmd["text"])
    elif op == "click":
        b.find_element(By.ID, cmd["id"]).click()
    elif op == "eval":
        return b.execute_script(cmd["js"])
    elif op == "wait":
        deadline = time.monotonic() + cmd.get("timeout", 20)
        while True:
            value = b.execute_script(cmd["js"])
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {cmd.get('timeout', 20)} s: {cmd['js']}")
            time.sleep(0.05)
    elif op == "screenshot":
        b.save_screenshot(cmd["path"])
    elif op == "logs":
        return [f"{e['level']} {e['message']}" for e in b.get_log("browser")]
    else:
        raise ValueError(f"unknown op {op}")
    return None


if __name__ == "__main__":
    main()
