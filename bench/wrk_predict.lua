-- wrk script for bench/serving.py: predicts against random heads, each request with its
-- head's tenant key. Arguments (after --): a folder holding targets.txt ("head_id key"
-- per line) and image<i>.jpg / image<i>.b64, the images per request, and "json" (base64
-- in JSON) or "raw" (the JPEG as the body; several as multipart "image" files).
local targets, images, encoded = {}, {}, {}
local per_request, body_kind
local boundary = "graft-bench-3f9c1d0e"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local folder = args[1]
  per_request, body_kind = tonumber(args[2]), args[3]
  for line in io.lines(folder .. "/targets.txt") do
    local id, key = line:match("(%S+) (%S+)")
    targets[#targets + 1] = { "/v1/heads/" .. id .. "/predict", "Bearer " .. key }
  end
  local i = 0
  while true do
    local image = read(folder .. "/image" .. i .. ".jpg")
    if not image then break end
    images[#images + 1] = image
    encoded[#encoded + 1] = read(folder .. "/image" .. i .. ".b64")
    i = i + 1
  end
end

function request()
  local target = targets[math.random(#targets)]
  local headers = { ["Authorization"] = target[2] }
  local parts = {}
  if body_kind == "json" then
    for k = 1, per_request do
      parts[k] = '{"image":"' .. encoded[math.random(#encoded)] .. '"}'
    end
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", target[1], headers, '{"inputs":[' .. table.concat(parts, ",") .. "]}")
  end
  if per_request == 1 then
    headers["Content-Type"] = "image/jpeg"
    return wrk.format("POST", target[1], headers, images[math.random(#images)])
  end
  for k = 1, per_request do
    parts[k] = "--" .. boundary .. '\r\nContent-Disposition: form-data; name="image"; filename="'
      .. k .. '.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' .. images[math.random(#images)] .. "\r\n"
  end
  headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  return wrk.format("POST", target[1], headers, table.concat(parts) .. "--" .. boundary .. "--\r\n")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "errors": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
