// Decodes 402x headers with the published x402 v2 core package (@x402/core) and
// validates them against its zod schemas. Input: a JSON file with the base64 header
// values; output on stdout: one JSON object with what the package decoded and any
// schema issues, for the Rust test (client/tests/interop.rs) to compare.
import { readFileSync } from "node:fs";
import {
  decodePaymentRequiredHeader,
  decodePaymentSignatureHeader,
  decodePaymentResponseHeader,
} from "@x402/core/http";
import { parsePaymentRequired, parsePaymentPayload } from "@x402/core/schemas";

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));

function issues(result) {
  return result.success
    ? []
    : result.error.issues.map((i) => ({ path: i.path.join("."), message: i.message }));
}

const challenge = decodePaymentRequiredHeader(input.challengeHeader);
const payment = decodePaymentSignatureHeader(input.paymentHeader);
const receipt = decodePaymentResponseHeader(input.receiptHeader);
const out = {
  challenge,
  challengeIssues: issues(parsePaymentRequired(challenge)),
  bodyIssues: issues(parsePaymentRequired(JSON.parse(input.challengeBody))),
  payment,
  paymentIssues: issues(parsePaymentPayload(payment)),
  receipt,
};
process.stdout.write(JSON.stringify(out) + "\n");
