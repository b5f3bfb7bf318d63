// The web phone: a client of the call service's WebSocket session
// (subprotocol videocall.v1.json: the Session protocol's ClientMessage and
// ServerMessage in protobuf's JSON mapping; see docs/web.md). Media goes
// between the browsers over WebRTC; the signaling goes through the call:
// the caller's SDP offer rides in the REQUEST's user string, the callee's
// answer in its REPLY's (complete descriptions, no trickle ICE),
// compressed to fit the 4096-byte user string.
"use strict";

const CODES = {
  0: "ok",
  440: "already in a call",
  100101: "cancelled by the caller",
  100102: "the user is offline",
  100103: "the user is busy",
  100104: "rejected",
  100105: "no answer",
  100106: "the connection was lost",
  100107: "not in a call",
  100201: "the business service is unavailable",
  100202: "answered on another device",
  100203: "invalid request",
  100204: "too many requests: slow down",
  100205: "not allowed now",
  100206: "ended by the service",
  100207: "the service is overloaded",
  100208: "the call state is unavailable: retry",
  100209: "the new token was refused",
};
const words = (code) => CODES[code] || `code ${code}`;
const $ = (id) => document.getElementById(id);
const MAX_USER_STR = 4096;
// STUN/TURN servers for media behind NAT; none are needed on one network.
const ICE_SERVERS = [];

// What the page knows; `window.phone` lets a test (or a curious user) look.
const phone = {
  state: "signed out", // signed out | connecting | idle | calling | ringing | talking
  me: null,
  call: null, // { id, peer, role: "caller" | "callee", offer, room }
  room: null,
  events: [],
  ice: "new",
  pc: null,
  credentials: null, // { token, user }
  resumeToken: "",
  ws: null,
  seq: 0,
  waiting: new Map(), // seq -> resolve
  seen: new Set(), // "callId/type": repeats after a resume are dropped
  retry: 500,
  resumes: 0, // streams that took this device's place after a break
  async framesDecoded() {
    if (!this.pc) return 0;
    let frames = 0;
    (await this.pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") frames += r.framesDecoded || 0;
    });
    return frames;
  },
};
window.phone = phone;

function log(text, bad) {
  const li = document.createElement("li");
  const t = document.createElement("span");
  t.className = "t";
  t.textContent = new Date().toLocaleTimeString();
  li.append(t, document.createTextNode(text));
  if (bad) li.className = "bad";
  $("log").prepend(li);
}

function show() {
  const signedIn = phone.state !== "signed out";
  $("signin").hidden = signedIn;
  $("phone").hidden = !signedIn;
  const status = $("status");
  status.textContent = phone.state;
  status.className = "status " + (phone.state === "signed out" ? "off" : phone.state === "connecting" ? "wait" : "on");
  $("me").textContent = phone.me || "";
  const c = phone.call;
  $("ringing").hidden = phone.state !== "ringing";
  $("hangup").hidden = !c || phone.state === "ringing";
  $("call").disabled = phone.state !== "idle";
  let line = "No call";
  if (c && phone.state === "calling") line = `Calling ${c.peer}…`;
  if (c && phone.state === "ringing") line = `${c.peer} is calling`;
  if (c && phone.state === "talking") line = `In a call with ${c.peer} (room ${phone.room})` + (phone.ice ? ` · media ${phone.ice}` : "");
  $("call-state").textContent = line;
  document.title = phone.state === "ringing" ? `Ringing: ${c.peer}` : "Video call";
}

// --- the session --------------------------------------------------------

function connect() {
  phone.state = "connecting";
  show();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/session`;
  const ws = new WebSocket(url, "videocall.v1.json");
  phone.ws = ws;
  ws.onopen = () => {
    const { token, user } = phone.credentials;
    ws.send(JSON.stringify({ token, devUserId: user, resumeToken: phone.resumeToken }));
  };
  ws.onmessage = (m) => {
    let msg;
    try {
      msg = JSON.parse(m.data);
    } catch (e) {
      log(`unreadable message from the service: ${e}`, true);
      return;
    }
    receive(msg);
  };
  ws.onclose = (e) => {
    if (phone.ws !== ws) return;
    phone.ws = null;
    for (const resolve of phone.waiting.values()) resolve({ code: -1, message: "connection lost" });
    phone.waiting.clear();
    if (phone.credentials === null) return;
    // 4000 + the gRPC status code (see docs/web.md).
    const why = e.reason || `closed (${e.code})`;
    if (e.code === 4016 || e.code === 4009 || e.code === 4003 || e.code === 4008) {
      log(`session ended: ${why}`, true);
      signedOut(e.code === 4009 ? "resumed in another tab" : why);
      return;
    }
    log(`connection lost (${why}); reconnecting`, true);
    phone.state = "connecting";
    show();
    setTimeout(connect, phone.retry);
    phone.retry = Math.min(phone.retry * 2, 8000);
  };
}

function send(msg) {
  if (!phone.ws || phone.ws.readyState !== WebSocket.OPEN) return false;
  phone.ws.send(JSON.stringify(msg));
  return true;
}

// A control; resolves with its ControlResult.
function control(eventType, peer, fields = {}) {
  const seq = ++phone.seq;
  return new Promise((resolve) => {
    phone.waiting.set(seq, resolve);
    if (!send({ control: { seq, eventType: `EVENT_TYPE_${eventType}`, peerUserId: peer, ...fields } })) {
      phone.waiting.delete(seq);
      resolve({ code: -1, message: "not connected" });
    }
  });
}

function receive(msg) {
  if (msg.connected) {
    const c = msg.connected;
    phone.me = c.userId;
    phone.resumeToken = c.resumeToken;
    phone.retry = 500;
    if (c.resumed) phone.resumes += 1;
    log(c.resumed ? "reconnected: the call goes on" : `signed in as ${c.userId}`);
    if (!c.resumed) {
      // A new device: whatever call the page showed is gone.
      endCall(null);
    }
    // Back where the call was (a resumed device keeps its call).
    const c2 = phone.call;
    phone.state = !c2 ? "idle" : phone.room ? "talking" : c2.role === "caller" ? "calling" : "ringing";
    show();
  } else if (msg.result) {
    const r = msg.result;
    const resolve = phone.waiting.get(Number(r.seq));
    phone.waiting.delete(Number(r.seq));
    if (resolve) resolve({ code: r.code || 0, callId: r.callId || "", message: r.message || "" });
  } else if (msg.event) {
    event(msg.event);
  } else if (msg.refreshDue) {
    if (phone.credentials.token) $("refresh").hidden = false;
  } else if (msg.refreshResult) {
    const r = msg.refreshResult;
    log(r.code ? `token refused: ${r.message}` : "token refreshed", Boolean(r.code));
    if (!r.code) $("refresh").hidden = true;
  }
}

function event(e) {
  const type = (e.eventType || "").replace("EVENT_TYPE_", "");
  const key = `${e.callId}/${type}`;
  if (e.callId && phone.seen.has(key)) return; // sent again after a resume
  if (e.callId) phone.seen.add(key);
  const code = e.errorCode || 0;
  phone.events.push({ type, peer: e.peerUserId, code, callId: e.callId, param: e.param || 0 });
  const user = parseUserStr(e.userStr || "");
  let text = `${type} ${type === "REQUEST" ? "from" : "with"} ${e.peerUserId}`;
  if (type === "START") text += `: room ${e.param || 0}`;
  if ((type === "REPLY" || type === "FINISH") && code) text += `: ${words(code)}`;
  if (type === "REPLY" && !code) text += ": answered";
  if (user.text) text += ` “${user.text}”`;
  log(text, (type === "REPLY" || type === "FINISH") && code !== 0);

  if (type === "REQUEST") {
    phone.call = { id: e.callId, peer: e.peerUserId, role: "callee", offer: user.offer };
    phone.state = "ringing";
    $("caller").textContent = e.peerUserId;
    $("caller-message").textContent = user.text || "(no message)";
  } else if (type === "REPLY" && phone.call && phone.call.id === e.callId) {
    if (code) endCall(words(code));
    else if (user.answer && phone.pc) {
      inflate(user.answer)
        .then((sdp) => phone.pc.setRemoteDescription({ type: "answer", sdp }))
        .catch((err) => log(`the answer could not be used: ${err}`, true));
    }
  } else if (type === "START" && phone.call && phone.call.id === e.callId) {
    phone.room = e.param || 0;
    phone.call.room = phone.room;
    phone.state = "talking";
  } else if (type === "FINISH" && phone.call && phone.call.id === e.callId) {
    endCall(code ? words(code) : "hung up");
  }
  show();
}

// A user string from another web phone is JSON with the text and the SDP;
// from any other client it is just text.
function parseUserStr(s) {
  try {
    const v = JSON.parse(s);
    if (v && typeof v === "object" && !Array.isArray(v)) return v;
  } catch (_) { /* plain text */ }
  return { text: s };
}

// --- media ----------------------------------------------------------------

async function deflate(text) {
  const stream = new Blob([text]).stream().pipeThrough(new CompressionStream("deflate-raw"));
  const bytes = new Uint8Array(await new Response(stream).arrayBuffer());
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

async function inflate(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Response(stream).text();
}

async function media() {
  const pc = new RTCPeerConnection({ iceServers: ICE_SERVERS });
  phone.pc = pc;
  phone.ice = "new";
  pc.onconnectionstatechange = () => {
    phone.ice = pc.connectionState;
    show();
  };
  pc.ontrack = (e) => {
    $("remote").srcObject = e.streams[0] || new MediaStream([e.track]);
  };
  try {
    const local = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    $("local").srcObject = local;
    for (const track of local.getTracks()) pc.addTrack(track, local);
  } catch (err) {
    log(`no camera (${err.name}): receiving only`, true);
    pc.addTransceiver("video", { direction: "recvonly" });
  }
  return pc;
}

// The complete local description, once its candidates are gathered.
async function gathered(pc) {
  if (pc.iceGatheringState !== "complete") {
    await new Promise((resolve) => {
      const done = () => pc.iceGatheringState === "complete" && resolve();
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 3000);
    });
  }
  return pc.localDescription.sdp;
}

function stopMedia() {
  if (phone.pc) phone.pc.close();
  phone.pc = null;
  phone.ice = "";
  for (const v of [$("local"), $("remote")]) {
    if (v.srcObject) v.srcObject.getTracks().forEach((t) => t.stop());
    v.srcObject = null;
  }
}

function endCall(why) {
  if (phone.call && why) log(`call with ${phone.call.peer} ended: ${why}`);
  phone.call = null;
  phone.room = null;
  stopMedia();
  if (phone.state !== "signed out" && phone.state !== "connecting") phone.state = "idle";
}

// --- what the user does ---------------------------------------------------

async function dial(peer, text) {
  const pc = await media();
  await pc.setLocalDescription(await pc.createOffer());
  const offer = await deflate(await gathered(pc));
  let userStr = JSON.stringify({ text, offer });
  if (userStr.length > MAX_USER_STR) {
    log("the video offer does not fit in a call request: calling without video", true);
    userStr = JSON.stringify({ text });
    stopMedia();
  }
  phone.call = { id: null, peer, role: "caller" };
  phone.state = "calling";
  show();
  const r = await control("REQUEST", peer, { userStr });
  if (r.code !== 0) {
    log(`call to ${peer} refused: ${r.code > 0 ? words(r.code) : r.message}`, true);
    endCall(null);
  } else if (phone.call && phone.call.id === null) {
    phone.call.id = r.callId;
  }
  show();
}

async function answer() {
  const c = phone.call;
  if (!c) return;
  let userStr = "";
  if (c.offer) {
    try {
      const pc = await media();
      await pc.setRemoteDescription({ type: "offer", sdp: await inflate(c.offer) });
      await pc.setLocalDescription(await pc.createAnswer());
      userStr = JSON.stringify({ answer: await deflate(await gathered(pc)) });
    } catch (err) {
      log(`no video for this call: ${err}`, true);
      stopMedia();
    }
  }
  const r = await control("REPLY", c.peer, { errorCode: 0, userStr });
  if (r.code !== 0) {
    log(`could not answer: ${r.code > 0 ? words(r.code) : r.message}`, true);
    endCall(null);
    show();
  }
}

async function reject() {
  const c = phone.call;
  if (!c) return;
  await control("REPLY", c.peer, { errorCode: 100104 });
  endCall("rejected");
  show();
}

async function hangup() {
  const c = phone.call;
  if (!c) return;
  await control("FINISH", c.peer);
  endCall("hung up");
  show();
}

function signIn(token, user) {
  phone.credentials = { token, user };
  sessionStorage.setItem("videocall", JSON.stringify(phone.credentials));
  connect();
}

function signedOut(why) {
  phone.credentials = null;
  phone.resumeToken = "";
  sessionStorage.removeItem("videocall");
  endCall(null);
  phone.state = "signed out";
  if (why) log(`signed out: ${why}`, true);
  show();
}

$("signin-go").onclick = () => {
  const token = $("token").value.trim();
  const user = $("user").value.trim();
  if (!token && !user) return log("a token or a user name, please", true);
  signIn(token, user);
};
$("signout").onclick = () => {
  const ws = phone.ws;
  signedOut(null);
  if (ws) ws.close(1000);
};
$("dial").onsubmit = (e) => {
  e.preventDefault();
  dial($("peer").value.trim(), $("message").value);
};
$("answer").onclick = answer;
$("reject").onclick = reject;
$("hangup").onclick = hangup;
$("refresh-go").onclick = () => {
  const token = $("new-token").value.trim();
  if (!token) return;
  phone.credentials.token = token;
  sessionStorage.setItem("videocall", JSON.stringify(phone.credentials));
  send({ refresh: { seq: ++phone.seq, token } });
};

// Signed in already in this tab (a reload): go on.
const saved = sessionStorage.getItem("videocall");
if (saved) signIn(...Object.values(JSON.parse(saved)));
show();
