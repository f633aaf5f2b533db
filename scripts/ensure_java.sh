#!/bin/sh
# METEOR and the reference PTB tokenizer of pycocoevalcap run on Java. Install a headless JRE when it is missing
# and we may (root with apt-get); otherwise say so: the Java tests are then skipped and METEOR is not scored.
if command -v java >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Java not found: installing default-jre-headless (for METEOR)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null 2>&1
    } || echo "Could not install Java: METEOR tests will be skipped."
else
    echo "Java not found: METEOR tests will be skipped (install a JRE, e.g. apt-get install default-jre-headless)."
fi
exit 0
